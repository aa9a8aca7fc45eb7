"""Readers and recipes under bad input, third probe (DESIGN section 10: nothing silently
substituted, narrowed or dropped; a reject names the file, field and what was expected; a repair
is recorded). Each test builds its own tiny input in tmp_path.

  * NIfTI: a vox_offset inside the header, more bytes than the header describes: rejects; no
    qform / sform: the orientation nibabel assumes from pixdim is a recorded repair.
  * PNG / JPEG: a Pillow mode that conversion to 8-bit RGB would narrow (float TIFF content),
    or transparency it would drop: rejects; the lossless modes are stored as they were.
  * DICOM: PixelSpacing that differs between slices, an InstanceNumber gap without positions:
    rejects; PixelSpacing or slice positions absent: the 1.0 mm assumed is a recorded repair.
  * Library warnings (Pillow's DecompressionBombWarning, numpy's via nibabel) are not bare
    stderr lines.
  * Recipes: a case of 0 images is a row reject; a malformed articles_resave.json is one
    InputError before anything is written; a CSV cell over 131072 characters is read.
"""

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import conftest_data as cd
from radfm_jax.data import recipes
from radfm_jax.data.ingest import ingest
from radfm_jax.data.readers import RejectedScan, read_scan
from radfm_jax.data.store import VolumeStore
from radfm_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLUME = np.arange(48, dtype=np.int16).reshape(4, 4, 3)


_ingest, _stored, _reason = cd.ingest_paths, cd.stored_scan, cd.reject_reason


def _rejected(path) -> str:
  with pytest.raises(RejectedScan) as e:
    read_scan(str(path))
  assert str(e.value) == f'{path}: {e.value.reason}'
  return e.value.reason


# ------------------------------------------------------------------------------------------------
# 1.-3. NIfTI


def _nifti(tmp_path, name, patches=(), tail=b'', klass='Nifti1Image'):
  """A NIfTI written by nibabel (RAS affine, spacing 1, 1, 2; an sform), raw header fields patched
  ((struct format, offset, values) each), `tail` appended, gzipped for a .gz name."""
  import nibabel as nib
  raw = bytearray(getattr(nib, klass)(VOLUME, cd.ras_affine((1.0, 1.0, 2.0))).to_bytes())
  for fmt, offset, values in patches:
    struct.pack_into(fmt, raw, offset, *values)
  data = bytes(raw) + tail
  path = tmp_path / name
  path.write_bytes(gzip.compress(data) if name.endswith('.gz') else data)
  return path


@pytest.mark.parametrize('name', ['v.nii', 'v.nii.gz'])
@pytest.mark.parametrize('offset', [0.0, 100.0])
def test_nifti_vox_offset_inside_the_header_is_a_reject(tmp_path, name, offset):
  """Was: vox_offset 0 stored the header's own bytes as voxels (.nii), or failed with
  nibabel's 'WrapStructError: Binary block is wrong size' (.nii.gz); 100 was refused in
  nibabel's words."""
  path = _nifti(tmp_path, name, [('<f', 108, (offset,))])
  report, store, log = _ingest(tmp_path, name)
  reason = (f'vox_offset {offset:g} in the NIfTI header: the voxel data would start inside the '
            '352-byte header; expected a vox_offset of at least 352')
  assert _reason(report, path) == reason
  assert report.stored == [] and f'ingest: rejected {path}: {reason}\n' in log
  assert _rejected(path) == reason


def test_nifti2_vox_offset_inside_its_header_is_a_reject(tmp_path):
  path = _nifti(tmp_path, 'v2.nii', [('<q', 168, (0,))], klass='Nifti2Image')
  assert _rejected(path) == ('vox_offset 0 in the NIfTI header: the voxel data would start '
                             'inside the 544-byte header; expected a vox_offset of at least 544')


def test_nifti_without_qform_or_sform_is_stored_with_the_assumed_orientation_recorded(tmp_path):
  """qform_code = sform_code = 0: nibabel's affine from pixdim alone flips x (LAS); the stored
  RAS array follows it and says so."""
  path = _nifti(tmp_path, 'noq.nii', [('<hh', 252, (0, 0))])
  kept = _nifti(tmp_path, 'q.nii', [('<hh', 252, (1, 0))])         # a qform: no assumption
  report, store, log = _ingest(tmp_path, 'noq.nii', 'q.nii')
  array, attrs, sid = _stored(report, store, path)
  np.testing.assert_array_equal(array[0], VOLUME[::-1])             # LAS -> RAS: x reversed
  assert attrs['source_orientation'] == 'LAS' and attrs['spacing'] == [1.0, 1.0, 2.0]
  text = ('NIfTI qform_code 0 and sform_code 0 (no qform / sform): orientation assumed from '
          "pixdim alone (nibabel's default affine: voxel axes LAS)")
  assert attrs['geometry_assumed'] == [text]
  assert store.warnings() == report.warnings == [
      {'path': str(path), 'scan_id': sid, 'warning': f'geometry assumed: {text}',
       'repaired': True}]
  assert f'ingest: repaired {path}: geometry assumed: {text}\n' in log
  array, attrs, _ = _stored(report, store, kept)
  np.testing.assert_array_equal(array[0], VOLUME)
  assert 'geometry_assumed' not in attrs


@pytest.mark.parametrize('name', ['x.nii', 'x.nii.gz'])
@pytest.mark.parametrize('case', ['bytes_appended', 'dim3_lowered'])
def test_nifti_holding_more_bytes_than_its_header_describes_is_a_reject(tmp_path, name, case):
  """Was: read up to what the header claims and the rest dropped unsaid."""
  if case == 'bytes_appended':
    path, shape, size, more, voxels = _nifti(tmp_path, name, tail=b'\0' * 120), 3, 568, 120, 96
  else:                                                              # dim[3] 3 -> 2
    path, shape, size, more, voxels = _nifti(tmp_path, name, [('<h', 46, (2,))]), 2, 448, 32, 64
  holds = 'the decompressed gzip stream' if name.endswith('.gz') else 'the file'
  reason = (f'NIfTI shape [4, 4, {shape}] int16: {holds} holds {size} bytes, {more} more than the '
            f'header describes (vox_offset 352 + {voxels} bytes of voxels); expected a file that '
            'ends with its voxels (a dim edited, or two files joined?)')
  report, store, _ = _ingest(tmp_path, name)
  assert _reason(report, path) == reason and report.stored == []
  assert _rejected(path) == reason


def test_nifti_holding_fewer_bytes_is_still_a_reject(tmp_path):
  path = tmp_path / 'short.nii'
  path.write_bytes(_nifti(tmp_path, 'full.nii').read_bytes()[:-10])
  assert _rejected(path) == ('NIfTI shape [4, 4, 3] int16: the header claims 96 bytes of pixel '
                             'data but the file holds 86; expected a complete file')


# ------------------------------------------------------------------------------------------------
# 4. PNG / JPEG: Pillow modes


@pytest.mark.parametrize('name', ['f_wide.png', 'f_wide.jpg'])
def test_float_image_content_is_a_reject_not_clipped_to_uint8(tmp_path, name):
  """Was: float TIFF content in a .png clipped to uint8 RGB, recorded as source dtype uint8."""
  from PIL import Image
  values = np.linspace(-500.5, 3000.25, 120).reshape(12, 10).astype(np.float32)
  Image.fromarray(values, 'F').save(tmp_path / name, format='TIFF')
  report, store, log = _ingest(tmp_path, name)
  reason = ('a TIFF image of Pillow mode F (bands F), which conversion to 8-bit RGB would narrow; '
            'expected 8-bit grey or colour (L, RGB, P, CMYK, ...), 16-bit grey (I;16) or 32-bit '
            'integer grey (I), or a .npy of the values')
  assert _reason(report, tmp_path / name) == reason and report.stored == []
  assert f'ingest: rejected {tmp_path / name}: {reason}\n' in log


def test_other_colour_spaces_are_converted_as_the_original_converts_them(tmp_path):
  """A CMYK JPEG is 8-bit RGB by Pillow's convert('RGB'), as the original RadFM loads every 2D
  image; the mode it came in is recorded (image_mode)."""
  from PIL import Image
  Image.new('CMYK', (6, 4), (10, 20, 30, 40)).save(tmp_path / 'c.jpg')
  want = np.moveaxis(np.asarray(Image.open(tmp_path / 'c.jpg').convert('RGB')), -1, 0)
  report, store, _ = _ingest(tmp_path, 'c.jpg')
  array, attrs, _ = _stored(report, store, tmp_path / 'c.jpg')
  np.testing.assert_array_equal(array, want[..., None])
  assert attrs['image_mode'] == 'CMYK' and report.rejects == []


def test_lossless_image_modes_are_stored_as_their_values(tmp_path):
  """16-bit grey PNG, int32 TIFF content, an opaque RGBA PNG and a palette PNG: what the modes
  hold, exactly."""
  from PIL import Image
  grey16 = (np.arange(120).reshape(12, 10) * 500).astype(np.uint16)
  Image.fromarray(grey16).save(tmp_path / 'g16.png')
  int32 = (np.arange(120).reshape(12, 10) * 40000 - 2_000_000).astype(np.int32)
  Image.fromarray(int32, 'I').save(tmp_path / 'i32.png', format='TIFF')
  rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  Image.fromarray(np.dstack([rgb, np.full((12, 10), 255, np.uint8)]), 'RGBA').save(
      tmp_path / 'rgba.png')
  Image.fromarray(rgb).convert('P').save(tmp_path / 'p.png')
  palette = np.asarray(Image.open(tmp_path / 'p.png').convert('RGB'))
  report, store, log = _ingest(tmp_path, 'g16.png', 'i32.png', 'rgba.png', 'p.png')
  assert report.rejects == [] and report.warnings == []
  for name, expected, mode in [('g16.png', grey16[None], 'I;16'), ('i32.png', int32[None], 'I'),
                               ('rgba.png', np.moveaxis(rgb, -1, 0), 'RGBA'),
                               ('p.png', np.moveaxis(palette, -1, 0), 'P')]:
    array, attrs, _ = _stored(report, store, tmp_path / name)
    assert array.dtype == expected.dtype, name
    np.testing.assert_array_equal(array, expected[..., None])
    assert attrs['image_mode'] == mode and attrs['source_dtype'] == str(expected.dtype)


@pytest.mark.parametrize('mode', ['RGBA', 'LA'])
def test_transparent_pixels_are_a_warning_their_rgb_kept_as_the_original(tmp_path, mode):
  """The alpha channel dropped by the conversion to RGB, as the original's convert('RGB') drops
  it (the RGB under a transparent pixel kept): said, a warning naming how many pixels (was:
  nothing said)."""
  from PIL import Image
  pixels = np.full((4, 5, len(mode)), 200, np.uint8)
  pixels[..., :-1] += np.arange(20, dtype=np.uint8).reshape(4, 5, 1)   # not a constant image
  pixels[..., -1] = 255
  pixels[1, 2, -1] = 0
  Image.fromarray(pixels, mode).save(tmp_path / 't.png')
  want = np.moveaxis(np.asarray(Image.open(tmp_path / 't.png').convert('RGB')), -1, 0)
  report, store, log = _ingest(tmp_path, 't.png')
  array, attrs, _ = _stored(report, store, tmp_path / 't.png')
  np.testing.assert_array_equal(array, want[..., None])
  said = (f'Pillow mode {mode}: 1 pixels not opaque (alpha 0 to 255); the transparency dropped, '
          "their RGB values kept, as the original's convert('RGB') keeps them")
  assert attrs['image_warnings'] == [said]
  assert [w['warning'] for w in report.warnings] == [f'image: {said}']
  assert said in log


# ------------------------------------------------------------------------------------------------
# 5. DICOM geometry


def _series(folder, edit=None, n=4):
  """cd.write_dicom_series of a [6, 5, n] volume (files in slice order), then `edit(i, ds)` on
  each file's dataset. Returns the stored values (HU)."""
  import pydicom
  raw = cd.ct_volume((6, 5, n)).astype(np.uint16)
  cd.write_dicom_series(folder, raw, shuffle_files=False)
  if edit is not None:
    for i, name in enumerate(sorted(os.listdir(folder))):
      ds = pydicom.dcmread(os.path.join(folder, name))
      if edit(i, ds) is False:
        os.remove(os.path.join(folder, name))
      else:
        ds.save_as(os.path.join(folder, name))
  return raw.astype(np.int32) - 1024


def test_dicom_slices_of_different_pixel_spacing_are_a_reject(tmp_path):
  """Was: stored with the first slice's spacing."""
  def edit(i, ds):
    if i == 2:
      ds.PixelSpacing = [0.5, 0.7]
  _series(tmp_path / 'mixed', edit)
  report, store, log = _ingest(tmp_path, 'mixed')
  reason = ("slice_002.dcm: PixelSpacing [0.5, 0.7] where slice_000.dcm has PixelSpacing "
            '[0.8, 0.7]; expected one pixel spacing for the series')
  assert _reason(report, tmp_path / 'mixed') == reason and report.stored == []

  def drop(i, ds):
    if i == 1:
      del ds.PixelSpacing
  _series(tmp_path / 'some', drop)
  assert _rejected(tmp_path / 'some') == (
      'slice_001.dcm: no PixelSpacing where slice_000.dcm has PixelSpacing [0.8, 0.7]; expected '
      'one pixel spacing for the series')


def test_dicom_without_pixel_spacing_records_the_spacing_assumed(tmp_path):
  """Was: spacing 1.0 silently, and the series not reoriented (orientation 'image') although
  its positions and orientation were there."""
  def edit(i, ds):
    del ds.PixelSpacing
  hu = _series(tmp_path / 'nosp', edit)
  report, store, log = _ingest(tmp_path, 'nosp')
  array, attrs, sid = _stored(report, store, tmp_path / 'nosp')
  np.testing.assert_array_equal(array[0], np.transpose(hu, (1, 0, 2))[::-1, ::-1, :])
  assert attrs['orientation'] == 'RAS' and attrs['source_orientation'] == 'PLS'
  assert attrs['spacing'] == [1.0, 1.0, 2.5]             # the positions' 2.5 mm kept
  text = 'PixelSpacing in no file: row and column spacing assumed 1.0 mm'
  assert attrs['geometry_assumed'] == [text]
  assert store.warnings() == [{'path': str(tmp_path / 'nosp'), 'scan_id': sid,
                               'warning': f'geometry assumed: {text}', 'repaired': True}]
  assert f'ingest: repaired {tmp_path / "nosp"}: geometry assumed: {text}\n' in log


def _no_geometry(i, ds):
  del ds.ImagePositionPatient, ds.ImageOrientationPatient
  ds.InstanceNumber = i + 1


def test_dicom_without_positions_records_the_slice_spacing_assumed(tmp_path):
  hu = _series(tmp_path / 'nopos', _no_geometry)
  report, store, log = _ingest(tmp_path, 'nopos')
  array, attrs, sid = _stored(report, store, tmp_path / 'nopos')
  np.testing.assert_array_equal(array[0], hu)            # InstanceNumber order, as stored
  assert attrs['spacing'] == [0.8, 0.7, 1.0] and attrs['orientation'] == 'image'
  text = ('no ImagePositionPatient / ImageOrientationPatient: 4 slices in InstanceNumber order, '
          'spacing between slices assumed 1.0 mm')
  assert attrs['geometry_assumed'] == [text]
  assert store.warnings() == [{'path': str(tmp_path / 'nopos'), 'scan_id': sid,
                               'warning': f'geometry assumed: {text}', 'repaired': True}]


def test_dicom_instance_number_gap_without_positions_is_a_reject(tmp_path):
  """Was: a missing slice file joined its neighbours at the invented 1.0 mm."""
  def edit(i, ds):
    _no_geometry(i, ds)
    return i != 2                                        # slice 3 of 5 missing
  _series(tmp_path / 'gap', edit, n=5)
  report, store, _ = _ingest(tmp_path, 'gap')
  assert _reason(report, tmp_path / 'gap') == (
      'InstanceNumber 2 (slice_001.dcm) is followed by 4 (slice_003.dcm) in slices without '
      'patient geometry (a missing slice?); expected consecutive InstanceNumbers, one file per '
      'slice')
  assert report.stored == []


def test_single_dicom_image_without_geometry_keeps_its_pixel_spacing_and_no_repair(tmp_path):
  """A 2D image (an X-ray): its pixel spacing, slice spacing 1.0 as for any 2D image."""
  def edit(i, ds):
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
  hu = _series(tmp_path / 'x', edit, n=1)
  (array, attrs), = read_scan(str(tmp_path / 'x' / 'slice_000.dcm'))
  np.testing.assert_array_equal(array[0], hu)
  assert attrs['spacing'] == [0.8, 0.7, 1.0] and 'geometry_assumed' not in attrs


# ------------------------------------------------------------------------------------------------
# 8. library warnings


def test_library_warnings_are_not_bare_stderr_lines(tmp_path):
  """In a process of its own (pytest swaps `warnings.showwarning` per test): a PNG header of
  10000 x 9000 (Pillow's DecompressionBombWarning) and a NIfTI with an inf pixdim and no sform
  (numpy's 'invalid value encountered' inside nibabel) are rejects with nothing else said."""
  raw = bytearray(open(cd.write_png(tmp_path / 'small.png',
                                    np.arange(64, dtype=np.uint8).reshape(8, 8)), 'rb').read())
  struct.pack_into('>II', raw, 16, 10000, 9000)               # IHDR width / height
  struct.pack_into('>I', raw, 29, zlib.crc32(bytes(raw[12:29])))
  (tmp_path / 'big.png').write_bytes(bytes(raw))
  _nifti(tmp_path, 'inf.nii', [('<hh', 252, (0, 0)), ('<f', 80, (np.inf,))])
  script = ('import sys\n'
            'from radfm_jax.data.readers import RejectedScan, read_scan\n'
            'for path in sys.argv[1:]:\n'
            '  try:\n'
            '    read_scan(path)\n'
            '  except RejectedScan as e:\n'
            '    print(e)\n')
  done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'big.png'),
                         str(tmp_path / 'inf.nii')], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'))
  assert done.returncode == 0 and done.stderr == '', done.stderr
  big, inf = done.stdout.splitlines()
  assert big.startswith(f'{tmp_path / "big.png"}: PNG 10000 x 9000 L: the header claims '
                        '90,000,000 bytes from ')
  assert inf.startswith(f'{tmp_path / "inf.nii"}: affine ') and 'is not finite' in inf


# ------------------------------------------------------------------------------------------------
# 6.-7. recipes: 3D cases and the articles side file


def test_case_of_no_images_is_a_row_reject(tmp_path):
  """Was: a sample with "images": []."""
  img = tmp_path / 'img'
  img.mkdir()
  np.save(img / 'none.npy', np.zeros((0, 3, 4, 4, 2), np.float32))
  split = tmp_path / 'radiology_vqa_test.csv'
  split.write_text('image_path,question,answer\nnone.npy,Where?,Liver.\n')
  res = recipes.records('radio_vqa', str(split), str(img))
  problem = (f'{img / "none.npy"}: the case [S, C, H, W, D] [0, 3, 4, 4, 2] holds no images; '
             'expected at least one')
  assert res.records == [] and [r['reason'] for r in res.rejects] == [
      f'{split} line 2 field image_path: {problem}']
  assert res.rejects[0]['field'] == 'image_path' and res.rejects[0]['line'] == 2
  article = {'pat': 'p', 'pre': 'q', 'npy_path': 'none.npy', 'finding': 'f', 'impression': 'i'}
  split = tmp_path / 'radiology_article_npy_test.json'
  split.write_text(json.dumps([article]))
  res = recipes.records('radio_caption', str(split), str(img))
  assert res.records == [] and [r['reason'] for r in res.rejects] == [
      f'{split} [0] field npy_path: {problem}']


def test_malformed_articles_file_is_one_error_before_anything_is_written(tmp_path):
  """Was: a RowError for the rows whose coin drew a "no" question only."""
  img = tmp_path / 'img'
  img.mkdir()
  np.save(img / 'case.npy', np.random.default_rng(0).random((1, 1, 4, 4, 2)).astype(np.float32))
  article = {'pat': 'p', 'pre': 'q', 'npy_path': 'case.npy', 'title': 'Lung cancer',
             'articles': ['Text.'], 'radiographic_features': ['Round.']}
  split = tmp_path / 'radiology_article_npy_test.json'
  split.write_text(json.dumps([article] * 6))
  side = tmp_path / 'articles_resave.json'
  for text, got in [('["Lung cancer", "Sarcoidosis"]', '["Lung cancer", "Sarcoidosis"]'),
                    ('{}', '{}')]:
    side.write_text(text)
    for seed in range(3):
      with pytest.raises(InputError) as e:
        recipes.records('radio_features', str(split), str(img), seed=seed)
      assert str(e.value) == (f'{side}: got {got}; expected a JSON object keyed by article title '
                              '({"title": ...})')
    with pytest.raises(InputError):
      recipes.ingest_recipe('radio_features', str(split), str(img), str(tmp_path / 'store'),
                            log=io.StringIO())
    assert not (tmp_path / 'store').exists()
  side.write_text(json.dumps({'Lung cancer': 1, 'Sarcoidosis': 2}))
  res = recipes.records('radio_features', str(split), str(img))
  assert len(res.records) == 6 and res.rejects == []


# ------------------------------------------------------------------------------------------------
# 9. CSV cells longer than the csv module's default limit


def test_csv_cell_over_131072_characters_is_read_as_it_is(tmp_path):
  """Was: 'not valid CSV (field larger than field limit (131072))'; pandas reads it."""
  cd.write_png(tmp_path / 'vq.png', np.arange(64, dtype=np.uint8).reshape(8, 8))
  answer = 'A long report. ' * 10000                       # 150,000 characters
  split = tmp_path / 'vqarad_test.csv'
  split.write_text('img_root_dir,Figure_path,Question,Answer\n'
                   f',vq.png,What is it?,"{answer}"\n')
  res = recipes.records('vqa_rad', str(split), str(tmp_path))
  (record,) = res.records
  assert record['answer'] == answer and len(answer) > 131072 and res.rejects == []


def test_a_changed_file_with_another_image_count_is_a_reject_not_a_mix(tmp_path):
  """A 5D case stored as foo_0..foo_2 whose file now holds 2 images: its new version would have
  replaced foo_0 and foo_1 and left foo_2, the stored sample naming all three mixing the two
  versions, and the same command run again refused. Now the new version is a reject naming the
  counts; the store keeps the earlier version whole, and a re-run says the same."""
  stack = tmp_path / 'stack.npy'
  np.save(stack, np.arange(96, dtype=np.int16).reshape(3, 1, 4, 4, 2))
  for name in 'ab':
    cd.write_manifest(tmp_path / f'{name}.jsonl', [{'id': name, 'question': 'q', 'answer': name,
                      'images': [{'path': 'stack.npy', 'id': 'foo'}]}])
  out = str(tmp_path / 'store')
  ingest(str(tmp_path / 'a.jsonl'), out, log=io.StringIO())
  np.save(stack, (np.arange(64, dtype=np.int16) + 100).reshape(2, 1, 4, 4, 2))
  for _ in range(2):                                 # the same command twice: the same outcome
    log = io.StringIO()
    report = ingest(str(tmp_path / 'b.jsonl'), out, log=log)
    assert _reason(report, stack) == (
        'the file now holds 2 image(s) where the store holds 3 of its earlier version under this '
        'id (foo_0, foo_1, foo_2), which stored samples name; expected the same number of images '
        '(a changed file keeps its ids), or another id (images[].id) for the new file')
    assert report.samples == 0 and report.dropped_samples == 1
  store = VolumeStore(out)
  rows = [json.loads(line) for line in open(store.manifest_path)]
  assert [r['id'] for r in rows] == ['a']
  assert [im['id'] for im in rows[0]['images']] == ['foo_0', 'foo_1', 'foo_2']
  for s in range(3):                                 # the earlier version, whole
    np.testing.assert_array_equal(store.read(f'foo_{s}')[0],
                                  np.arange(96, dtype=np.int16).reshape(3, 1, 4, 4, 2)[s, 0])


def test_a_conflict_of_a_recipe_record_names_its_split_file_and_line(tmp_path):
  """In-memory records (a recipe's) that say where they came from (`source`): an error about
  one names that file and line, not only 'manifest record N'."""
  path = tmp_path / 'a.png'
  cd.write_png(path, (np.arange(48).reshape(8, 6) * 5).astype(np.uint8))
  record = {'id': 'vqa_rad-test-0', 'question': 'q', 'answer': 'yes', 'split': 'test',
            'images': [{'path': str(path)}], 'source': 'vqarad_test.csv line 2'}
  out = str(tmp_path / 'store')
  ingest([record], out, log=io.StringIO())
  with pytest.raises(InputError) as e:
    ingest([dict(record, answer='no', source='vqarad_test.csv line 3')], out, log=io.StringIO())
  assert str(e.value).startswith(
      "vqarad_test.csv line 3 (manifest record 1 field answer): sample id 'vqa_rad-test-0' is "
      'already in the store'), e.value
